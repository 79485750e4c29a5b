# Linkerd's balancer: power of two choices over a peak-EWMA of latency per endpoint (tower's
# PeakEwma). The cost of an endpoint is its decayed RTT estimate times (in-flight requests + 1):
# a slow or busy endpoint looks expensive, an idle one drifts cheaper so it gets probed again.

from libc.math cimport exp


cdef class PeakEwma:
    """Load estimate of one endpoint. Times are seconds (a monotonic clock), RTTs milliseconds."""
    cdef public double rtt_ms
    cdef public double stamp
    cdef public long pending
    cdef public double decay_s

    def __cinit__(self, double default_rtt_ms=30.0, double decay_s=10.0, double now=0.0):
        if decay_s <= 0:
            raise ValueError(f"decay_s must be > 0, got {decay_s}")
        self.rtt_ms = default_rtt_ms
        self.stamp = now
        self.pending = 0
        self.decay_s = decay_s

    cpdef double cost(self, double now):
        cdef double elapsed = now - self.stamp
        cdef double rtt = self.rtt_ms
        if elapsed > 0:
            rtt = rtt * exp(-elapsed / self.decay_s)
        return rtt * (self.pending + 1)

    cpdef void start(self):
        self.pending += 1

    cpdef void finish(self, double rtt_ms, double now):
        """A request sent at `now - rtt_ms/1000` completed: fold its RTT in (a peak replaces the
        estimate at once, a lower RTT is blended in with weight growing with the elapsed time)."""
        cdef double elapsed, w
        if self.pending > 0:
            self.pending -= 1
        if rtt_ms > self.rtt_ms:
            self.rtt_ms = rtt_ms
        else:
            elapsed = now - self.stamp
            w = exp(-elapsed / self.decay_s) if elapsed > 0 else 1.0
            self.rtt_ms = self.rtt_ms * w + rtt_ms * (1.0 - w)
        if now > self.stamp:
            self.stamp = now


cdef class P2C:
    """Pick the cheaper of two distinct random endpoints (xorshift64*, seedable for tests)."""
    cdef unsigned long long state

    def __cinit__(self, unsigned long long seed=0x9E3779B97F4A7C15):
        self.state = seed if seed != 0 else 1

    cdef inline unsigned long long _next(self):
        cdef unsigned long long x = self.state
        x ^= x >> 12
        x ^= x << 25
        x ^= x >> 27
        self.state = x
        return x * 0x2545F4914F6CDD1DULL

    cpdef Py_ssize_t pick(self, list loads, double now):
        """Index into `loads` (a non-empty list of PeakEwma)."""
        cdef Py_ssize_t n = len(loads)
        cdef Py_ssize_t a, b
        if n == 0:
            raise ValueError("no endpoints to pick from")
        if n == 1:
            return 0
        a = <Py_ssize_t>(self._next() % <unsigned long long>n)
        b = <Py_ssize_t>(self._next() % <unsigned long long>(n - 1))
        if b >= a:
            b += 1
        if (<PeakEwma>loads[b]).cost(now) < (<PeakEwma>loads[a]).cost(now):
            return b
        return a
