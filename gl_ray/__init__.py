"""gl-ray: GrowLength pretraining (Jin et al. 2023) on Ray Data, Ray Train and Ray Tune."""

__version__ = "0.1.0"
