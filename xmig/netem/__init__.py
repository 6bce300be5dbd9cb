"""WAN link emulation for tests, drills and benchmarks."""
