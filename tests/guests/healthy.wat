;; Healthy: sets `x-healthy: 1` on the request and `x-healthy: 1` on the
;; response.
(module
  (import "cistern" "header_set" (func $header_set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x-healthy")
  (data (i32.const 16) "1")
  (func (export "cistern_abi_version") (result i32) i32.const 1)
  (func (export "on_request") (result i32)
    (call $header_set (i32.const 0) (i32.const 0) (i32.const 9) (i32.const 16) (i32.const 1)))
  (func (export "on_response") (result i32)
    (call $header_set (i32.const 1) (i32.const 0) (i32.const 9) (i32.const 16) (i32.const 1))))
