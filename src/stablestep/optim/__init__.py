"""stablestep.optim"""
