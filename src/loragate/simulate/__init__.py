"""loragate.simulate"""
