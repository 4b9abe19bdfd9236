"""The shipped hardware profiles: one YAML file per deployment target (backend, dtypes, weight format, kernel
capabilities and limits), read by `runtime.profile`. A package only so that the YAML files install with the wheel."""
