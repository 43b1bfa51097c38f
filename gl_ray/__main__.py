import sys

from gl_ray.cli import main

sys.exit(main())
