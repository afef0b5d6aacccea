"""Policy serving: server (the `wmpo.v1.Policy` gRPC API), batcher, versions, observation; imports modelling only."""
