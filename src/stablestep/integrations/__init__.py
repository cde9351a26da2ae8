"""stablestep.integrations"""
