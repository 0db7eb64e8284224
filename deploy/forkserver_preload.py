"""Imported by the decode forkserver when it starts (``deploy.isolation.FORKSERVER_PRELOAD``), and by nothing else.

Importing it ends the importing process when its parent ends (``deploy.isolation.exit_with``): a ``kill -9`` of
the program takes its forkserver along, and with it every decode process (``deploy.isolation.die_with_parent``).
A parent that died before this ran is covered by the forkserver itself: it exits when the pipe from the
program reads end-of-file, as no decode process exists yet to hold it open.
"""

import os

from deploy.isolation import exit_with

exit_with(os.getppid())
