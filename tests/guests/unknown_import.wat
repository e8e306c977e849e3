;; Imports a function the ABI does not have.
(module
  (import "cistern" "open_file" (func $open (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "cistern_abi_version") (result i32) i32.const 1)
  (func (export "on_request") (result i32) i32.const 0))
