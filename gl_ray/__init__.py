"""gl-ray: GrowLength pretraining (Jin et al. 2023) on Ray Data, Ray Train and Ray Tune."""

from gl_ray.versions import check_versions

__version__ = "0.1.0"

check_versions()
