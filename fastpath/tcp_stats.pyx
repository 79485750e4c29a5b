# TCP golden-metric counters for one label set, bumped per read/write by the relay in C and read
# at scrape time by a prometheus Collector (no Python-level observe() per byte chunk).

cdef class TcpStats:
    cdef public unsigned long long open_total
    cdef public long long open_connections
    cdef public unsigned long long close_total
    cdef public unsigned long long read_bytes
    cdef public unsigned long long write_bytes

    def __cinit__(self):
        self.open_total = 0
        self.open_connections = 0
        self.close_total = 0
        self.read_bytes = 0
        self.write_bytes = 0

    cpdef void opened(self):
        self.open_total += 1
        self.open_connections += 1

    cpdef void closed(self):
        self.close_total += 1
        self.open_connections -= 1

    cpdef void add_read(self, Py_ssize_t n):
        self.read_bytes += n

    cpdef void add_write(self, Py_ssize_t n):
        self.write_bytes += n
