"""meshc: compile service-mesh traffic policy into Istio resources and Envoy xDS snapshots."""

__version__ = "0.1.0"
