;; Says version 1 but exports the version-2 `on_body` hook: refused at load
;; rather than silently ignored.
(module
  (memory (export "memory") 1)
  (func (export "cistern_abi_version") (result i32) i32.const 1)
  (func (export "on_body") (result i32) i32.const 0))
