"""The wmpo gRPC API, version 1: messages and stubs generated from the .proto files beside this file.

Regenerate with `make proto`; never edit the `*_pb2*.py(i)` files by hand.
"""
