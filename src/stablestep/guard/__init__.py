"""stablestep.guard"""
