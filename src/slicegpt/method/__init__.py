"""SliceGPT's maths: fold norms, find bases by PCA, rotate and slice weights, refit. Imports only the layers below (architectures)."""
