"""stablestep.telemetry"""
