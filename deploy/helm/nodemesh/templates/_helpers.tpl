{{/* Labels every object carries; keep in sync with nodemesh/install.py (tests compare renderings). */}}
{{- define "nodemesh.labels" -}}
app.kubernetes.io/component: {{ . }}
app.kubernetes.io/name: nodemesh
app.kubernetes.io/part-of: nodemesh
{{- end -}}

{{- define "nodemesh.selector" -}}
app.kubernetes.io/component: {{ . }}
app.kubernetes.io/name: nodemesh
{{- end -}}

{{- define "nodemesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "nodemesh.hasIdentity" -}}
{{- if or .Values.identity.trustAnchorsPEM .Values.identity.issuer.crtPEM .Values.identity.issuer.keyPEM -}}
{{- if not (and .Values.identity.trustAnchorsPEM .Values.identity.issuer.crtPEM .Values.identity.issuer.keyPEM) -}}
{{- fail "identity: set all of trustAnchorsPEM, issuer.crtPEM and issuer.keyPEM, or none" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}
