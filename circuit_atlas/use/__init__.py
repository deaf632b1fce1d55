"""use: the atlas for agents and people (the MCP server).

Reads the lake only; imports no torch (a tokenizer, where one is at hand, names
tokens).
"""
