"""loragate.loadtest"""
