"""The module inside nnU-Net's wrappers (DDP, ``torch.compile``)."""


def unwrapped_network(network):
    """The module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(network, '_orig_mod'):
            network = network._orig_mod
        elif type(network).__name__ == 'DistributedDataParallel':
            network = network.module
        else:
            return network
