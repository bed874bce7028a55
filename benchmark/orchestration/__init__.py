"""Many cells: the GPU/CPU process launcher (`launcher`), each cell's outcome and the sweep's
parent run and summary (`sweep`), and one cell over several GPUs (`distributed`)."""
