"""Custom Diffusion (Kumari et al. 2023, arXiv 2212.04488): the pieces the method is built from.

- ``surgery``: cross-attention processors initialised from the base weights, modifier tokens;
- ``concepts``: the concepts to learn (flags or ``--concepts_list``) and their checks;
- ``data``: instance/class examples and the paper's rescale augmentation with a loss mask;
- ``class_images``: generate the missing prior images with the base model (resumable);
- ``retrieve``: a clip-retrieval kNN client that downloads a real prior;
- ``export``: diffusers-loadable weight and embedding files, and loading them back;
- ``merge`` / ``compress``: the paper's closed-form multi-concept merge and low-rank deltas;
- ``eval``: concept fidelity and prior drift, measured.
"""
