"""Hospital-side silo agent: site config, data source, local training, gRPC client."""
