"""The domain core: state machine, event application, leases. No grpc, aiohttp or driver."""
