/* Entries of the test guest.
 *
 * _start: the VMM's entry, already in long mode (64-bit code segment, paging on, the first
 *   4 GiB identity-mapped), rsi = Linux zero page.
 * pvh_start: the PVH entry (Xen ELF note 18, what QEMU's `-kernel` uses for an ELF): 32-bit
 *   protected mode, paging off, ebx = hvm_start_info. It builds the same identity map, turns on
 *   long mode and joins the 64-bit path.
 * Both call guest_main(zero_page, pvh_start_info) with the one they have and 0 for the other. */

    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* name size: "Xen\0" */
    .long 4                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start

    .section .text.start, "ax"
    .globl _start
    .code64
_start:
    cli
    lea stack_top(%rip), %rsp
    xor %rbp, %rbp
    mov %rsi, %rdi          /* the zero page (Linux boot protocol) */
    xor %esi, %esi
    call guest_main
1:  hlt
    jmp 1b

    .code32
    .globl pvh_start
pvh_start:
    cli
    mov %ebx, pvh_info
    /* PML4[0] -> PDPT; PDPT[0..3] -> four page directories of 2 MiB pages. */
    mov $pvh_pdpt, %eax
    or $3, %eax
    mov %eax, pvh_pml4
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $12, %eax
    add $pvh_pd, %eax
    or $3, %eax
    mov %eax, pvh_pdpt(,%ecx,8)
    inc %ecx
    cmp $4, %ecx
    jne 2b
    xor %ecx, %ecx
3:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, pvh_pd(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jne 3b
    mov %cr4, %eax
    or $0x20, %eax          /* PAE */
    mov %eax, %cr4
    mov $pvh_pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx   /* EFER */
    rdmsr
    or $0x100, %eax         /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax    /* PG, PE */
    mov %eax, %cr0
    lgdt pvh_gdt_ptr
    ljmp $0x08, $pvh64

    .code64
pvh64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    lea stack_top(%rip), %rsp
    xor %rbp, %rbp
    xor %edi, %edi
    mov pvh_info(%rip), %esi
    call guest_main
4:  hlt
    jmp 4b

    .section .rodata
    .balign 8
pvh_gdt:
    .quad 0
    .quad 0x00af9b000000ffff    /* 64-bit code */
    .quad 0x00cf93000000ffff    /* data */
pvh_gdt_ptr:
    .word pvh_gdt_ptr - pvh_gdt - 1
    .long pvh_gdt

    .section .bss
    .balign 4096
pvh_pml4:
    .skip 4096
pvh_pdpt:
    .skip 4096
pvh_pd:
    .skip 4096 * 4
    .balign 16
stack:
    .skip 16384
stack_top:
pvh_info:
    .skip 8
