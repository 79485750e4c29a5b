# HTTPRoute matching per request (agent/routes.py RouteTable.match is the pure-Python reference and
# the test oracle). The rules stay Python objects (the caller's Rule values are what `match`
# returns); their matches are flattened once per config into typed records, so a request walks C
# fields and only calls into Python for regular expressions.

cdef enum:
    _RT_EXACT = 0
    _RT_PREFIX = 1
    _RT_REGEX = 2


cdef class _RouteMatch:
    cdef int path_type
    cdef str path  # Exact: the path; PathPrefix: the prefix without its trailing "/"
    cdef str path_slash  # PathPrefix: prefix + "/"
    cdef object path_regex
    cdef bytes method  # None: any method
    cdef tuple names  # lowercase header names
    cdef tuple values
    cdef tuple regexes  # per header: a compiled pattern or None

    def __init__(self, m):
        t = m.path_type
        self.path_type = _RT_EXACT if t == "Exact" else _RT_PREFIX if t == "PathPrefix" else _RT_REGEX
        if self.path_type == _RT_PREFIX:
            self.path = m.path.rstrip("/")
            self.path_slash = self.path + "/"
        else:
            self.path = m.path
            self.path_slash = ""
        self.path_regex = m.path_regex
        self.method = m.method
        self.names = tuple(h.name for h in m.headers)
        self.values = tuple(h.value for h in m.headers)
        self.regexes = tuple(h.regex for h in m.headers)

    cdef bint matches(self, bytes method, str path, dict headers):
        cdef Py_ssize_t i
        cdef object v
        if self.method is not None and method != self.method:
            return False
        if self.path_type == _RT_EXACT:
            if path != self.path:
                return False
        elif self.path_type == _RT_PREFIX:
            if self.path and not (path == self.path or path.startswith(self.path_slash)):
                return False
        elif self.path_regex is not None and self.path_regex.fullmatch(path) is None:
            return False
        for i in range(len(self.names)):
            v = headers.get(self.names[i])
            if v is None:
                return False
            if self.regexes[i] is not None:
                if self.regexes[i].fullmatch(v) is None:
                    return False
            elif v != self.values[i]:
                return False
        return True


cdef class _RouteRule:
    cdef object rule
    cdef tuple matches


cdef class RouteMatcher:
    """Rules per (namespace, service, port) in precedence order, port 0 = every port."""
    cdef dict _rules

    def __init__(self, rules_by_parent):
        cdef _RouteRule r
        self._rules = {}
        for key, rules in rules_by_parent.items():
            out = []
            for rule in rules:
                r = _RouteRule()
                r.rule = rule
                r.matches = tuple(_RouteMatch(m) for m in rule.matches)
                out.append(r)
            self._rules[tuple(key)] = tuple(out)

    cpdef object match(self, str namespace, str service, int port, bytes method, str path, dict headers):
        """The first rule (port-specific rules first, then every-port ones) with a matching match."""
        cdef tuple rules
        cdef _RouteRule r
        cdef _RouteMatch m
        for key in ((namespace, service, port), (namespace, service, 0)):
            rules = self._rules.get(key)
            if rules is None:
                continue
            for r in rules:
                for m in r.matches:
                    if m.matches(method, path, headers):
                        return r.rule
        return None
