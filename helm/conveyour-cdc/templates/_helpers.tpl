{{/*
The chart's name, overridable with nameOverride.
*/}}
{{- define "conveyour-cdc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's resource name: fullnameOverride, else <release>-<chart> (just
<release> when it already holds the chart name), cut to the 63 characters a
Kubernetes name may have.
*/}}
{{- define "conveyour-cdc.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
chart-version, for the helm.sh/chart label.
*/}}
{{- define "conveyour-cdc.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The labels that pick this release's pods; never change them on upgrade.
*/}}
{{- define "conveyour-cdc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "conveyour-cdc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels on every resource.
*/}}
{{- define "conveyour-cdc.labels" -}}
helm.sh/chart: {{ include "conveyour-cdc.chart" . }}
{{ include "conveyour-cdc.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: cdc
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The ServiceAccount the pod runs as.
*/}}
{{- define "conveyour-cdc.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "conveyour-cdc.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: repository, tag (appVersion unless set) and digest.
*/}}
{{- define "conveyour-cdc.image" -}}
{{- $ref := printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- with .Values.image.digest }}
{{- $ref = printf "%s@%s" $ref . }}
{{- end }}
{{- $ref }}
{{- end }}

{{/*
The port the connector serves /metrics, /healthz and /readyz on, inside the pod.
*/}}
{{- define "conveyour-cdc.metricsPort" -}}
9187
{{- end }}

{{/*
The Secret holding the credentials: existingSecret.name, or the one this
chart renders. Fails when both are configured, since it would be unclear
which wins.
*/}}
{{- define "conveyour-cdc.secretName" -}}
{{- $inline := or .Values.secret.appkey .Values.secret.token .Values.secret.pgpassword }}
{{- if and .Values.existingSecret.name $inline }}
{{- fail "set either existingSecret.name or the inline secret.appkey/secret.token/secret.pgpassword, not both: with existingSecret, leave secret.* empty" }}
{{- end }}
{{- default (include "conveyour-cdc.fullname" .) .Values.existingSecret.name }}
{{- end }}

{{/*
The key in the Secret for one credential ("appkey", "token", "pgpassword").
*/}}
{{- define "conveyour-cdc.secretKey" -}}
{{- $root := index . 0 }}
{{- $which := index . 1 }}
{{- if $root.Values.existingSecret.name }}
{{- required (printf "existingSecret.keys.%s must name the key holding it in Secret %s" $which $root.Values.existingSecret.name) (index $root.Values.existingSecret.keys $which) }}
{{- else }}
{{- index (dict "appkey" "CONVEYOUR_APPKEY" "token" "CONVEYOUR_TOKEN" "pgpassword" "PGPASSWORD") $which }}
{{- end }}
{{- end }}

{{/*
The connector's config file. appkey, token and the database password are not
in it: they come from the Secret through the environment.
*/}}
{{- define "conveyour-cdc.configFile" -}}
{{- if not .Values.mapping }}
{{- fail "mapping is empty: list at least one table, with identify or track, under mapping (see values.yaml)" }}
{{- end }}
{{- $config := dict
      "postgres" .Values.config.postgres
      "conveyour" .Values.config.conveyour
      "metrics" (dict "listen" (printf "0.0.0.0:%s" (include "conveyour-cdc.metricsPort" .)))
      "tables" .Values.mapping }}
{{- with .Values.config.sync }}
{{- $_ := set $config "sync" . }}
{{- end }}
{{- with .Values.config.dead_letters }}
{{- $_ := set $config "dead_letters" . }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
PromQL label matchers for this release's series.
*/}}
{{- define "conveyour-cdc.promSelector" -}}
{{- default (printf "job=%q,namespace=%q" (include "conveyour-cdc.fullname" .) .Release.Namespace) .Values.prometheusRule.selector }}
{{- end }}
