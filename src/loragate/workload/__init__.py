"""loragate.workload"""
