"""The policy service: the VLA network, imitation training, the gRPC policy server, version hot-swap.

Importing this package is cheap (no torch): the robot client (`wmpo.robot`) lives beside it.
"""
