"""Test support: real Envoy processes and small HTTP backends on loopback.

`backends` owns loopback addressing and the HTTP backends; `envoy` owns the
Envoy process and its admin API.
"""
