"""stablestep.lab"""
