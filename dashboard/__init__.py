"""The operators' web dashboard: an aiohttp app that is a gRPC client of the JobService.

It imports the generated stubs and never `service/`; it holds no state of its own
beyond the live fan-out of one WatchJobs stream to the open browser tabs.
"""
