"""Code both coordinator and silo need: wire format, TLS identity, PKI, secure aggregation, CLI."""
