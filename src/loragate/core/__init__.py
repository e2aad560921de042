"""Core types, clocks and errors shared by every other package (imports nothing of loragate)."""
