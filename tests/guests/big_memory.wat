;; Declares 8 MiB of initial memory: fails to instantiate under a smaller cap.
(module
  (memory (export "memory") 128)
  (func (export "cistern_abi_version") (result i32) i32.const 1)
  (func (export "on_request") (result i32) i32.const 0))
