"""loragate.state"""
