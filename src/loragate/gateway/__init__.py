"""loragate.gateway"""
