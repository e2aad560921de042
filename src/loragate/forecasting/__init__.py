"""loragate.forecasting"""
