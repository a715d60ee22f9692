"""hadakron: LoHa and LoKr adapters for SDXL and Anima, in pure torch (no ComfyUI import anywhere).

Subpackages: ops (the algebra), adapters (trainable modules), arch (model families and key layouts),
network (attach adapters to a model), io (adapter files), merge (bake/combine/convert), train, cli.
"""
__version__ = "0.1.0"
