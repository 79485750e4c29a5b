# The one extension module's surface is the union of its units (each unit's .pyi beside this one).
from nodemesh.fastpath.balance import *
from nodemesh.fastpath.detect import *
from nodemesh.fastpath.histogram import *
from nodemesh.fastpath.http1 import *
from nodemesh.fastpath.route import *
from nodemesh.fastpath.tcp_stats import *
