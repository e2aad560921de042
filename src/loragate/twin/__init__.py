"""loragate.twin"""
