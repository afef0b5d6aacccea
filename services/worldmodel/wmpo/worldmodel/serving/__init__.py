"""World-model serving: triton (the `dream`/`reward` models), client, imagination (gRPC API); imports modelling only."""
