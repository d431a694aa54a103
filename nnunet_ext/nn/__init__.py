"""Network building blocks (deformable convolution, attention gate, IFE selectors). Depend on torch only."""
