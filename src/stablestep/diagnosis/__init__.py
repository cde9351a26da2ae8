"""stablestep.diagnosis"""
