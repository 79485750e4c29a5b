# HTTP golden metrics for one label set, counted in C per request and read at scrape time by the
# prometheus Collector in agent/metrics.py (no Python observe() per request).

# Linkerd's response_latency_ms bucket bounds (ms); +Inf is implicit.
LATENCY_BUCKETS_MS = (1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0,
                      500.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0)
cdef int _NB = 25
cdef double _BOUNDS[25]
for _i, _b in enumerate(LATENCY_BUCKETS_MS):
    _BOUNDS[_i] = _b


cdef class LatencyHistogram:
    cdef unsigned long long counts[26]
    cdef public double sum
    cdef public unsigned long long count

    def __cinit__(self):
        cdef int i
        for i in range(26):
            self.counts[i] = 0
        self.sum = 0.0
        self.count = 0

    cpdef void observe(self, double ms):
        cdef int lo = 0, hi = _NB, mid
        while lo < hi:  # first bound >= ms (prometheus buckets are upper-inclusive)
            mid = (lo + hi) >> 1
            if _BOUNDS[mid] < ms:
                lo = mid + 1
            else:
                hi = mid
        self.counts[lo] += 1
        self.sum += ms
        self.count += 1

    def cumulative(self):
        """[(upper bound as prometheus text, cumulative count)], ending with "+Inf"."""
        cdef int i
        cdef unsigned long long acc = 0
        out = []
        for i in range(_NB):
            acc += self.counts[i]
            out.append(("%d" % <long long>_BOUNDS[i], acc))
        acc += self.counts[_NB]
        out.append(("+Inf", acc))
        return out


cdef class HttpStats:
    """request_total, response_total by (status_code, classification), response_latency_ms."""
    cdef public unsigned long long requests
    cdef public unsigned long long retries
    cdef unsigned long long by_status[600][2]
    cdef unsigned long long by_grpc[17][2]  # HTTP 200 responses by grpc-status 0-16 (gRPC over h2)
    cdef public LatencyHistogram latency

    def __cinit__(self):
        self.requests = 0
        self.retries = 0
        for i in range(600):
            self.by_status[i][0] = 0
            self.by_status[i][1] = 0
        for i in range(17):
            self.by_grpc[i][0] = 0
            self.by_grpc[i][1] = 0
        self.latency = LatencyHistogram()

    cpdef void request(self):
        self.requests += 1

    cpdef void retry(self):
        self.retries += 1

    cpdef void response(self, int status, bint failure, double latency_ms):
        if status < 0 or status >= 600:
            status = 0  # no HTTP status (e.g. the proxy gave up): status_code label ""
        self.by_status[status][1 if failure else 0] += 1
        self.latency.observe(latency_ms)

    def responses(self):
        """[(status_code or 0, failure, count)] for every non-zero cell."""
        cdef int s, f
        out = []
        for s in range(600):
            for f in range(2):
                if self.by_status[s][f]:
                    out.append((s, bool(f), self.by_status[s][f]))
        return out

    cpdef void grpc_response(self, int grpc_status, bint failure, double latency_ms):
        """A gRPC response (HTTP 200) that ended with `grpc_status`; an unknown code counts as 2."""
        if grpc_status < 0 or grpc_status > 16:
            grpc_status = 2
        self.by_grpc[grpc_status][1 if failure else 0] += 1
        self.latency.observe(latency_ms)

    def grpc_responses(self):
        """[(grpc status, failure, count)] for every non-zero cell (all with status_code 200)."""
        cdef int s, f
        out = []
        for s in range(17):
            for f in range(2):
                if self.by_grpc[s][f]:
                    out.append((s, bool(f), self.by_grpc[s][f]))
        return out
