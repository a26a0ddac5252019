"""Python code the shipped example workflows call: tools named in tierflow.yaml."""
