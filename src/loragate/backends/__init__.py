"""loragate.backends"""
