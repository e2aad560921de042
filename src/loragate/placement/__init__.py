"""loragate.placement"""
