"""loragate.routing"""
