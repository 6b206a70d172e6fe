/* Entry of the test guest: the VMM enters here in long mode (64-bit code segment, paging on).
 * Set up a stack of our own and call main; if main returns, halt forever. */
    .section .text.start, "ax"
    .globl _start
    .code64
_start:
    cli
    lea stack_top(%rip), %rsp
    xor %rbp, %rbp
    mov %rsi, %rdi          /* the zero page (Linux boot protocol) */
    call guest_main
1:  hlt
    jmp 1b

    .section .bss
    .balign 16
stack:
    .skip 16384
stack_top:
