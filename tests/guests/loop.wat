;; Hostile: never returns from on_request.
(module
  (memory (export "memory") 1)
  (func (export "cistern_abi_version") (result i32) i32.const 1)
  (func (export "on_request") (result i32)
    (loop $forever (br $forever))
    i32.const 0))
